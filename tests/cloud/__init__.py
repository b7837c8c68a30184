"""The real nova cloud on loopback (root: RabbitMQ, MariaDB, nova services)."""
