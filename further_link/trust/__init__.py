"""Who may connect: the device token, pairing codes, TLS certificates, secret files."""
