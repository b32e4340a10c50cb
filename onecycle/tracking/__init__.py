"""The MLflow link: a stage's run and store, the background recorder, the logged model, the team server."""
