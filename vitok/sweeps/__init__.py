"""Experiment tooling: sweeps over config fields (sweep: members, names, the commands of a member)
and their reports (report: tables, the log2-E fit, plots)."""
