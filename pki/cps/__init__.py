"""ISO 15118-2 contract certificate provisioning (CPS): native EXI codec (``exi``), contract key
encryption for the vehicle (``keywrap``) and EXI XML signatures (``xmldsig``)."""
