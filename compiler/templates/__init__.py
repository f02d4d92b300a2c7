"""Triton source templates: each module turns a frozen spec into the text of one kernel file."""
