"""Ray stages the pipelines compose (Ray code lives here and in pipelines/, never in gems/)."""
