"""The device around the server: accounts, privilege drop, install-service, displays."""
