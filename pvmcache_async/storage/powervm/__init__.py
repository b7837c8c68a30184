"""The PowerVM volume group backend, on pypowervm."""
