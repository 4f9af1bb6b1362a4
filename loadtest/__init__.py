"""Load tests (Locust) and the serving benchmark; the load generator itself needs no torch."""
