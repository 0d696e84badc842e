from sce_jax.serve import cli

cli()
