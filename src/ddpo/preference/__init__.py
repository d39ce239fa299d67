"""People in the loop: the label store (`store`), image and prompt features (`features`) and the Bradley-Terry
preference model learned from labels (`model`). The labelling web app is `ddpo.server.label_app`; the rewards
built on labels (`preference:PATH`, `human_choice`) are in `ddpo.rewards.preference`."""
