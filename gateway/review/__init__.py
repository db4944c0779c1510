"""The review console: named people (password + TOTP) reviewing the audit log in a browser,
under ``/review/`` on the HTTPS listener (docs/review.md), and the index it searches.

    users      console users in the store (hashed password, sealed TOTP secret, role)
    login      checking a login: scrypt off the loop, a TOTP code once, lockout
    auth       sessions, the session cookie, CSRF tokens
    console    the gate every page passes (session, role, CSRF), templates, the clock
    pages      login, logout, verify and users pages, and every route (`setup`)
    overview   charts per day, the chain per stream, the sync backlog
    search     search, export (CSV, NDJSON) and a transaction's page
    filters    a search form read into a query (an address pseudonymised at once)
    history    a recipient's history: state now, every change and decision in order
    verifying  the chain and anchor check the verify page runs, and its last result
    charts     the overview's SVG charts (pygal), each with its numbers as a table
    index*     the audit index (SQLite, built incrementally from the audit files)
"""
