"""metarun's tests. A regular package, so that the top-level `tests` package that
learn2learn 0.2.0 installs cannot shadow it."""
