"""The spec model: YAML -> typed frozen Spec, its errors."""
