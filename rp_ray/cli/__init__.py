"""The `rp-ray` command (`main`) and its terminal chat client (`chat`)."""
