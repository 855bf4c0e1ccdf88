
2free":2prompts
"¸
x-rawraw