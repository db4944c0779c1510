"""The SMS channel (docs/guarantees.md §4): sending through a provider, and inbound texts.

    message.py    pure: validated outgoing texts (Twilio form, native JSON), the footer,
                  the refusals both APIs render (Twilio error body or RFC 9457 problem)
    signature.py  pure: the provider's webhook signature (X-Twilio-Signature)
    provider.py   the one pooled TLS 1.3 HTTPS client: provider sends and inbound forwards
    flow.py       one outgoing text: category -> one lookup -> decision (audited) -> send
    inbound.py    the provider's inbound webhook: STOP/START/HELP, revocations, forwarding
    keywords_store  inbound dedupe by MessageSid, and which opt-out a texted STOP made
                  (so START lifts that and nothing else)
    queue.py      inbound texts that could not be forwarded at once: encrypted Redis Stream
                  entries and the worker that retries them

The HTTP routes that translate requests into these calls are in `gateway.http.sms`.
"""
