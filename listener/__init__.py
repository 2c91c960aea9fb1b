"""listener: third-party feeds into reliable CloudEvents on RabbitMQ."""
