"""Running programs: processes, pseudo-terminals, containment, the warm pool. No JSON, no HTTP."""
