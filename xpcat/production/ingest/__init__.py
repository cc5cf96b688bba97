"""Raw tables in: the Gaia archive (astroquery), DR3 bulk files, sampled spectra, partner tables."""
