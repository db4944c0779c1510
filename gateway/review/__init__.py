"""The review console for security teams, and the index of the audit log it searches."""
