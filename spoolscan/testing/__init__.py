"""Real components for tests, benchmarks and the demo (``make run``): a private clamd
with a signature database built on the spot (``clamd``), and a private Postfix instance
with its own configuration, queue and Maildirs (``postfix``).  No pytest needed."""
