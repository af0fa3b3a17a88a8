"""Data stage: the embedded OC20-style dataset (`mini`) and the OC20 download (`oc20`)."""
