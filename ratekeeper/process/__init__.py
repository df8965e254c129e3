"""The command line, workers and their supervisor, and the balanced accept."""
