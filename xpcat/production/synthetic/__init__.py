"""The synthetic Gaia universe (population, truth SED, noise) and the local archive that serves it."""
