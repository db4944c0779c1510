"""The review console: named people (password + TOTP) reviewing the audit log in a browser,
under ``/review/`` on the HTTPS listener (docs/review.md).

    users      console users in the store (hashed password, sealed TOTP secret, role)
    login      checking a login: scrypt off the loop, TOTP once, lockout
    auth       sessions, the session cookie, CSRF tokens, the role gate
    console    mounting: routes, templates, the clock, shared helpers
    pages      overview, verify, login and logout pages
    search     search, export, transaction and recipient history pages
    charts     the overview's SVG charts (pygal), each with its numbers as a table
    index*     the audit index the pages search (SQLite, built from the audit files)
"""
