"""jobqueue: slow work behind HTTP, on worker threads behind bounded queues."""
