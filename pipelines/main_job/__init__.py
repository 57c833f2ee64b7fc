"""The main job: every stage in order under one work folder (`opqn pipeline`, flow `opqn-pipeline`)."""
