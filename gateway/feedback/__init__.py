"""Provider feedback: what SendGrid, Amazon SES (through SNS), mailbox providers' ARF
reports and Twilio tell the gateway about its recipients, verified and turned into
suppression (docs/feedback.md).

    sendgrid, sns, ses, arf, twilio   pure: verify a signature, parse a report into
                                      `events.Event` values or a `events.Malformed`
    certs                             IO: SNS signing certificates (fetched over TLS from
                                      the configured host pattern, cached) and the
                                      subscription confirmation GET
    apply                             IO: each event deduplicated, canonicalised as a send
                                      is, audited first, then written to the store

A complaint (and a provider's unsubscribe or STOP) becomes an opt-out of every opt-outable
category; a hard bounce or an unreachable number becomes an undeliverable mark
(`gateway.store.feedback`), which suppresses every opt-outable category for
`[feedback] undeliverable_days` and is not an opt-out.
"""
