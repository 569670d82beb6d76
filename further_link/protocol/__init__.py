"""Wire formats, without any IO: text in, typed commands out; typed events in, text out."""
