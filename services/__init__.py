"""Services prodcat talks to: Elasticsearch, RabbitMQ (publisher and write-back consumer), ScaNN, the image server."""
