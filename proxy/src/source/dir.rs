//! `--source dir:PATH`: Services, EndpointSlices and Nodes read from YAML files.
