"""The Glance v2 client: image records, streamed and verified downloads, retries."""
