"""The shipped control vectors (one folder per model), probes and refusal interventions, and the
datasets they were made from. Installed as the package `localsteer_vectors`, so that a wheel
carries them; `localsteer.shipped` finds them."""
