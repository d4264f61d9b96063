"""The pipeline around the stage commands: the stage table and dvc.yaml (`dag`), the shipped
profiles (`profiles`) and the writing of every schema key into params files (`fill`). Only the
`xtra dag` and `xtra profile` commands and the Snakefile import it."""
