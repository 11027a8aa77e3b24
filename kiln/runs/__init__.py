"""The one run-directory format: every command that writes a model writes it this way, and
every command reads any such directory (kiln.runs.artifact)."""
