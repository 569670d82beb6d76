"""The teacher's side: finding a class's devices, pairing them, and driving them together."""
