"""The learned controller: a factored actor-critic (``policy``), running observation statistics
(``normalize``) and an on-device PPO learner in PureJaxRL's structure (``ppo``)."""
