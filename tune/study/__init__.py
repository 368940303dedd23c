"""Study: the quality comparison of GEMS with the baselines and floors (methods, run, results)."""
