"""Tests with real processes, files and servers (Glance, Keystone); no nova."""
