"""The database: the extensions, the models, the one function that binds
`app.user_id` (tenancy), the pool's dead-connection handling and the isolation
check."""
