"""Support for the tests and the demo: Stripe payloads and a local stack."""
