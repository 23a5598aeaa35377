"""Read-only graph queries, site selection and functional graph passes."""
