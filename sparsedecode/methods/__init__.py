"""Decode-attention methods behind one interface (base.DecodeMethod), one module each."""
