"""The uncertainty pipeline and its command line: compile, run-local, upload, run."""
