"""OCPP 2.0.1-shaped endpoints, so a CSMS integrates in a few lines."""
