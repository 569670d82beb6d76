"""The command-line client: ``further-link run`` and ``pair``, and the hosts it remembers."""
