"""Who is who: each daemon's long-lived identity (identity.py), TLS 1.3 contexts pinned to
certificates (tls.py), a group's mutual TLS (group_tls.py) and the group token's HMAC challenge
(auth.py)."""
