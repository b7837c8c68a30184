"""The operators' command line: its commands, keystone sessions and progress display."""
