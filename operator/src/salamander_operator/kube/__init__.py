"""The Kubernetes backend: kopf handlers (:mod:`.handlers`) over a thin API adapter (:mod:`.cluster`)."""
