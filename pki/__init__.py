"""The CA engine: profiles, CSR checks, issuance, revocation, OCSP/CRL builders, audit."""
