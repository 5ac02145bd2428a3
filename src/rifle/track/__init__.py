"""The MLflow side: the tracker of a run (tracker), signals and run status (signals), the store and experiment
rule and paged searches (store), the parent runs of sweeps and campaigns (parents), bulk reads of many runs
(reads), and the selected network as an MLflow model (serving, pyfunc_model)."""
