"""Uploads, the url cache, the quota, and confining client-given names to their directory."""
