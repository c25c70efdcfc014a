"""Transport security for the daemon's three servers: TLS/mTLS (tls.py) and bearer-token auth (auth.py)."""
