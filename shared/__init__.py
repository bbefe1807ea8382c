"""Code both the API and the workers use: settings, database, storage, imaging, model."""
